"""Stitch shared code: preprocessing, scoring, gate math, index codec, wire types."""
