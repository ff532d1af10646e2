"""Edit requests and where they come from: loaders, the built-in sets, time slots, and the
simulation's partitions (relation groups, embedding clusters)."""
