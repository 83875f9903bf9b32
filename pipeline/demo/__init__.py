"""The demo wing: everything only the offline demo uses — its world (the raw datasets, generated),
the pretraining splits and the small backbones trained on them, and their cards."""
