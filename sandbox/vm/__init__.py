"""VM layer: spec, plan, accelerator, QEMU process, console, runs, bring-up, golden, templates.
Imports sandbox.imaging and the layers below it; never net, machine or the fronts.
"""
