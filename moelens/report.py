"""Alias of :mod:`moelens.plotting.report` (the HTML report scaffolding), kept for existing imports
(``from moelens.report import Report, write_image``)."""

from moelens.plotting.report import (  # noqa: F401
    IMAGE_FORMATS, Report, StaticExportError, chromium_path, format_duration, save_html, write_image, write_images,
)
