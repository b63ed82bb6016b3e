"""``python -m vggt.viewer --attn_dir EXPORT``: the viewer's command line (:mod:`vggt.viewer.cli`)."""

from vggt.viewer.cli import main

raise SystemExit(main())
