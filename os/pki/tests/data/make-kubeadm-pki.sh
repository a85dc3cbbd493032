#!/bin/sh
# Writes a kubeadm-like PKI directory with openssl into $1: RSA keys in PKCS#1 (as kubeadm
# writes them), the front-proxy CA key in PKCS#8 and the etcd CA key in SEC1, so an import
# exercises every key encoding.
set -eu
dir=$1
mkdir -p "$dir/etcd"
cd "$dir"
ca_ext="-addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign,digitalSignature"
openssl genrsa -traditional -out ca.key 2048 2>/dev/null
openssl req -x509 -new -key ca.key -subj /CN=kubernetes -days 3650 $ca_ext -out ca.crt
openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out front-proxy-ca.key 2>/dev/null
openssl req -x509 -new -key front-proxy-ca.key -subj /CN=front-proxy-ca -days 3650 $ca_ext -out front-proxy-ca.crt
openssl ecparam -name prime256v1 -genkey -noout -out etcd/ca.key
openssl req -x509 -new -key etcd/ca.key -subj /CN=etcd-ca -days 3650 $ca_ext -out etcd/ca.crt
openssl genrsa -traditional -out sa.key 2048 2>/dev/null
openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
