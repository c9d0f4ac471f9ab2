"""What the model side and the service share, torch-free and HTTP-free: the exception tree (`errors`),
the vocabulary contract (`vocab`), the bundle and its verification (`bundle`), and the records the
loop logs (`records`). The serving image holds this package and not the torch code of `model/`."""
