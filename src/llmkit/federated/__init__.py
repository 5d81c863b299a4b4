"""Federated fine-tuning with Flower: data owners train together and only weights travel, never their data.

A capability on top of the core (config, data, model, train, tasks): nothing in the core imports it. `config`
describes a run, `partition` / `data` deal the training split to clients, `client` trains one client through the
one loop, `privacy` clips, adds noise and accounts epsilon, `apps` holds Flower's ServerApp and ClientApp, and
`run` drives a whole experiment on one machine and writes the run folder.
"""
