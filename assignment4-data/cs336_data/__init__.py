"""CS336 assignment 4: web-data filtering pipeline."""
