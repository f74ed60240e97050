"""Online distillation feeds (``dfkd distill --online M``); feeds of their own (DFAD) are modules imported when
named (:data:`dfkd_common.index.INDEX`)."""

from dfkd_common.online.base import (
    ONLINE,
    FeedContext,
    OnlineFeed,
    RecordedFeed,
    build_online_feed,
    frozen,
    recording,
)

__all__ = ["ONLINE", "FeedContext", "OnlineFeed", "RecordedFeed", "build_online_feed", "frozen", "recording"]
