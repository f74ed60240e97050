"""Online distillation feeds (``dfkd distill --online M``). Importing this package registers every module here."""

from dfkd_common.online import dfad  # noqa: F401  (registers the dfad feed and the l1 student loss)
from dfkd_common.online.base import (
    ONLINE,
    FeedContext,
    OnlineFeed,
    RecordedFeed,
    build_online_feed,
    frozen,
    online_methods,
    recording,
)

__all__ = ["ONLINE", "FeedContext", "OnlineFeed", "RecordedFeed", "build_online_feed", "frozen", "online_methods",
           "recording"]
