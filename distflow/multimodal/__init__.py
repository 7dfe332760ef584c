"""Multimodal training data and scheduling: generated digit-image samples
(``digits``) and the DistTrain-style reordering of samples and microbatches (``reorder``)."""
