"""CS336 assignment 3: isoFLOPs scaling laws, a local training API and a budgeted study."""
