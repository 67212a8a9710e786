-- Shaped like Debian's /etc/prosody/prosody.cfg.lua: global settings, then hosts, then an
-- Include of conf.d at the very end. Written for the tests.
admins = { }
modules_enabled = {
	"roster"; "saslauth"; "tls"; "dialback"; "disco"; "ping"; "register";
	"http_openmetrics";
}
allow_registration = false
c2s_require_encryption = true
s2s_secure_auth = false
authentication = "internal_hashed"
log = {
	info = "/var/log/prosody/prosody.log";
	error = "/var/log/prosody/prosody.err";
}
certificates = "certs"

VirtualHost "localhost"

------ Additional config files ------
Include "conf.d/*.cfg.lua"
