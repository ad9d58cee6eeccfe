"""CS336 assignment 4: a web-data filtering pipeline."""
