"""Datasets: schemas, loaders for the accepted input forms, the train/test split and atomic writers."""
