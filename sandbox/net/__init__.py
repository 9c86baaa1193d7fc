"""Net layer: the switch, segments, private and named networks, a machine's side of them.
Imports sandbox.vm and the layers below it; never machine or the fronts.
"""
