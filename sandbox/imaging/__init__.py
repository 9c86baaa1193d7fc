"""Imaging layer: recipes, image builds, foreign disk imports, cloud-init seeds.
Imports sandbox.guest, sandbox.host, sandbox.base and sandbox.errors.
"""
