"""Base layer: paths, processes, sizes, progress, cache entries, the one wait helper.
Imports only sandbox.errors and the standard library; every layer may import it.
"""
