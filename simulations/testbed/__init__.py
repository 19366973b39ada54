"""The testbed: real cells in network namespaces on shaped links, and their storm figures.

`python -m simulations.testbed storm --cells 12 --image-mib 1024 --link 200mbit`
builds the network (net.py), runs the storm through celld and through a
pull-through cache (storm.py, one pull.py per cell), prints the figures and
removes what it made; `python -m simulations.testbed cleanup` removes what a
killed run left behind. A benchmark, not a timed test; needs root.
"""
