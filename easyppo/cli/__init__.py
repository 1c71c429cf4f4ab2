"""Command-line front ends: flags in, library calls out, user errors as one line (exit status 2)."""
