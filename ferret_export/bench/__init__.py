"""``ferret bench``: parameters, FLOPs and throughput of FerretNet and its peers across backends
(``run``), one runner per backend (``runners``), and the table and plots (``report``)."""
