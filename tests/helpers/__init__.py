"""What several test modules share: a tiny method scaffold and NumPy references of the losses."""
