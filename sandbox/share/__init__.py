"""Cache entries that move between hosts: an OCI registry client and the packing of entries
into registry artifacts or export files. May import base, host and guest; nothing above."""
