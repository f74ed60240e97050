"""Image-variation models for ``dfkd augment`` (DDA): Stable Diffusion image variations and an offline prior."""
