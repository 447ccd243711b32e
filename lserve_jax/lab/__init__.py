"""The testbed lab: synthetic retrieval tasks, testbed training and its recipe, DuoAttention
gate training, accuracy grids, selection coverage, plots and result provenance. Needs the `lab`
extra (`pip install -e '.[lab]'`); the serving library never imports it."""
