"""User-space data path: the HTTP logging front proxy and the NFQUEUE fallback."""
