"""evaluation: served measurement of drafters and the promotion gate."""
