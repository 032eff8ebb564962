"""Shared inference runner (Ray) used by every model stage."""
