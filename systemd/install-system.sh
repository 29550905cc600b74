#!/bin/sh
# `make install-system`: imdsd for production on a Debian/Ubuntu host, versioned.
#
#   /opt/imdsd/<version>/          a virtual environment holding this imdsd and its dependencies
#   /opt/imdsd/current -> <version>  what the unit runs; an upgrade installs beside and switches
#   /etc/systemd/system/imdsd.service, /usr/lib/sysusers.d/imdsd.conf, /usr/lib/tmpfiles.d/imdsd.conf
#   /etc/imdsd/imdsd.toml          a starter config, only when there is none
#
# DESTDIR=<dir> installs under <dir> instead of / (packaging, tests) and touches nothing else;
# without it, the imdsd user and folders are created and systemd is told about the unit.
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
root=${DESTDIR:-}
python=${PYTHON:-python3}
version=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$here/imdsd/__init__.py")
opt=$root/opt/imdsd

"$python" -m venv "$opt/$version"
"$opt/$version/bin/python" -m pip install --quiet --upgrade pip
"$opt/$version/bin/python" -m pip install --quiet "$here"
ln -sfn "$version" "$opt/current.new" && mv -T "$opt/current.new" "$opt/current"

install -D -m 0644 "$here/systemd/imdsd.service" "$root/etc/systemd/system/imdsd.service"
install -D -m 0644 "$here/systemd/imdsd.sysusers.conf" "$root/usr/lib/sysusers.d/imdsd.conf"
install -D -m 0644 "$here/systemd/imdsd.tmpfiles.conf" "$root/usr/lib/tmpfiles.d/imdsd.conf"
if [ ! -e "$root/etc/imdsd/imdsd.toml" ]; then
    install -D -m 0640 "$here/config/imdsd.starter.toml" "$root/etc/imdsd/imdsd.toml"
fi

if [ -z "$root" ]; then
    systemd-sysusers /usr/lib/sysusers.d/imdsd.conf
    systemd-tmpfiles --create /usr/lib/tmpfiles.d/imdsd.conf
    chgrp imdsd /etc/imdsd/imdsd.toml
    if [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
fi
echo "imdsd $version installed in $opt/$version (current); unit: $root/etc/systemd/system/imdsd.service"
