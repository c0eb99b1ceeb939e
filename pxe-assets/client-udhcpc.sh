#!/bin/sh
# udhcpc's script in the client initramfs: applies the lease to the interface (udhcpc itself
# configures nothing) and writes /run/si-net.env for /init.
case "$1" in
  deconfig)
    ip -4 addr flush dev "$interface"
    ip link set "$interface" up
    ;;
  bound|renew)
    ifconfig "$interface" "$ip" netmask "${subnet:-255.255.255.0}" ${broadcast:+broadcast "$broadcast"}
    if [ -n "$router" ]; then
      n=0
      while ip route del default dev "$interface" 2>/dev/null && [ $n -lt 10 ]; do n=$((n + 1)); done
      for r in $router; do ip route add default via "$r" dev "$interface" && break; done
    fi
    : > /etc/resolv.conf
    [ -n "$domain" ] && echo "search $domain" >> /etc/resolv.conf
    for d in $dns; do echo "nameserver $d" >> /etc/resolv.conf; done
    [ -n "$hostname" ] && hostname "$hostname"
    cat > /run/si-net.env <<ENV
SI_IFACE=$interface
SI_IP=$ip
SI_NETMASK=${subnet:-}
SI_ROUTER=${router%% *}
SI_SERVER=${serverid:-}
SI_HOSTNAME=${hostname:-}
ENV
    echo "si-init: dhcp $1 $ip/${subnet:-?} on $interface from ${serverid:-?}${hostname:+ hostname $hostname}"
    ;;
esac
exit 0
