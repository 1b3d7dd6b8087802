"""Collaborative LiDAR perception on simulated multi-vehicle scans (issue 23, DSRC): scenes, sensor, corruptions, metrics."""
