"""Machine layer: the guest API, its waits and saved states, templates, named machines.
Imports sandbox.net and every layer below; only the fronts (plugin, cli) import it.
"""
