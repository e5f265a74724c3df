"""Pieces the embedding engines (local threads, DataLoader, Ray) share."""
