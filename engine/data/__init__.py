"""Data: the procedural synthetic head (`engine.data.synthetic`) and the training data formats."""
