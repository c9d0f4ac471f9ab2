"""The offline side of the loop: jobs over the impression log (`din log export`), above `model/` and
the store. It reads the records of `contracts.records` and the key layout of `service.store.keys`,
never the service's internals; nothing here is imported by the server."""
