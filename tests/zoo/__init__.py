"""Test glue for the support-matrix engine, which lives in :mod:`lightning_ulysses.support`."""
