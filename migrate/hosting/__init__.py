"""Running the VMM as host processes: one host (source or destination) in
this process, a pair of them on loopback, and the raw RAM images a guest
can boot from."""
