"""Redis, in one place: the client factory (`client`), the key layout (`keys`), users' histories
(`history`), the private redis-server (`embedded`) and the bulk loader `din seed` (`seed`)."""
