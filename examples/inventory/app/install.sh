#!/bin/sh
# Install the inventory service, seed its database, start it (the slow setup a template saves).
set -eu
here=$(dirname "$0")
mkdir -p /opt/inventory /var/lib/inventory
cp "$here/seed.py" "$here/server.py" /opt/inventory/
python3 /opt/inventory/seed.py /var/lib/inventory/db.sqlite "${ROWS:-40000}"
systemd-run --unit inventory --property Restart=on-failure \
    python3 /opt/inventory/server.py /var/lib/inventory/db.sqlite
for _ in $(seq 50); do
    python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/stats')" \
        2>/dev/null && exit 0
    sleep 0.2
done
echo "the inventory service did not answer" >&2
exit 1
