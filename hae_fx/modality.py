"""Token modality tags stored per cache slot (`HAECache.modality`, int8)."""

TEXT = 0
VISUAL = 1
