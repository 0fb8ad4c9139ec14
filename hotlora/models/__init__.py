"""Model-building tools: the tiny local models, their pretraining, real shapes, and the SFT demo."""
