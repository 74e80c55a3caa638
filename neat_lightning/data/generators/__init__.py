"""The Lightning-free generators behind the DataModules: grid-world episodes and their images (``grids``), math
problems and memory tasks (``math``), dialogue scenes (``scenes``). Plain Python and torch; importing them never
loads Lightning, so they serve scripts, evaluations and other frameworks as they are."""
