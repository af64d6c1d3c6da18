"""Small helpers every layer uses: atomic writes and file hashing (`atomic`)."""
