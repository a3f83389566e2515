"""Screens: quick measurements on cached bottom outputs, each a named mode with a test
(tests/test_screens.py). Every result they produced that the docs keep is in docs/results.md,
with its command:

    python -m simulations.screening cache 3                               # the split-3 bottom outputs, first
    python -m simulations.screening basis 3 1,2,4,8 label,inverter,pca,random   # "Who chooses the basis"
    python -m simulations.screening device-agreement 3 10 iid             # "Label maps in a federation"
    python -m simulations.screening federated-map closed-form,reader 10 iid   # "Which map"
    python -m simulations.screening top-recipe 1 3 query,value 1          # "The top's recipe" (screen rows)
    python -m simulations.screening top-utility 0 none,label-subspace OUT # "The top's recipe" (three seeds)

The screens of the label subspace at split 1 (adversarial fits, non-linear maps, kept tokens)
were removed after 04918e1; their results are in docs/research-log.md with the commands that
ran them at that commit.
"""
