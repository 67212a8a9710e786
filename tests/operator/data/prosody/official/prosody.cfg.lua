-- Shaped like the config of the official Prosody 0.12 image (prosody/prosody-docker,
-- configs/prosody-0.12.cfg.lua): everything comes from PROSODY_* environment variables, the
-- host name from util.pposix, and the file ends with an Include of conf.d. Written for the tests.

local function _split(s, sep)
	if not s then return nil; end
	sep = sep or ",";
	local parts = {};
	for part in s:gmatch("[^"..sep.."]+") do
		parts[#parts+1] = part;
	end
	return parts;
end

plugin_paths = _split(ENV_PROSODY_PLUGIN_PATHS or "/etc/prosody/modules")
admins = _split(ENV_PROSODY_ADMINS)

local default_modules = {
	"disco"; "roster"; "saslauth"; "tls";
	"blocklist"; "bookmarks"; "carbons"; "dialback"; "limits"; "pep"; "private"; "smacks";
	"ping"; "register"; "time"; "uptime"; "version";
	--"http_openmetrics"; -- off unless PROSODY_ENABLE_MODULES asks for it
}
for _, module_name in ipairs(_split(ENV_PROSODY_ENABLE_MODULES) or {}) do
	default_modules[#default_modules+1] = module_name;
end
modules_enabled = default_modules
modules_disabled = _split(ENV_PROSODY_DISABLE_MODULES) or {}

s2s_secure_auth = ENV_PROSODY_S2S_SECURE_AUTH ~= "0"
authentication = "internal_hashed"
storage = ENV_PROSODY_SQL_DRIVER and "sql" or ENV_PROSODY_STORAGE or "internal"
archive_expires_after = (ENV_PROSODY_ARCHIVE_EXPIRY_DAYS or ENV_PROSODY_RETENTION_DAYS or "7").."d"

log = {
	[ENV_PROSODY_LOGLEVEL or "info"] = "*console";
}

statistics = ENV_PROSODY_STATISTICS
statistics_interval = tonumber(ENV_PROSODY_STATISTICS_INTERVAL) or ENV_PROSODY_STATISTICS_INTERVAL

certificates = ENV_PROSODY_CERTIFICATES or "certs"

local pp = require "util.pposix";
local vhosts = _split(ENV_PROSODY_VIRTUAL_HOSTS) or {pp.uname().nodename};
for _, vhost in ipairs(vhosts) do
	VirtualHost (vhost)
end

for _, component_def in ipairs(_split(ENV_PROSODY_COMPONENTS) or {}) do
	local c_name, c_type = component_def:match("^([^:]+):?(.*)$");
	Component (c_name) (c_type ~= "" and c_type or nil)
end

-- Settings below this line would belong to the last VirtualHost or Component; an Included file
-- starts in the global section again.
Include (ENV_PROSODY_EXTRA_CONFIG or "/etc/prosody/conf.d/*.cfg.lua")
