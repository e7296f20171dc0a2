"""Metrics and judges: CLIP evaluators (``evaluators``), judges (``judges``), CLIP accuracy / score / normalized
score (``clip_metrics``), attack success (``asr``), filter delivery (``filtering``), FID/KID (``fid``), bootstrap
and paired statistics (``stats``), CLIP-vs-judge agreement (``agreement``). Definitions: docs/metrics.md."""
