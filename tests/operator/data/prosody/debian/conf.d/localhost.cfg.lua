-- A host of its own, as Debian ships it in conf.avail/.
VirtualHost "example.org"
	enabled = true
