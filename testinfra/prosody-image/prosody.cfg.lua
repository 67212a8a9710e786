-- The image's default configuration (testinfra/prosody-image). A pod usually mounts its own
-- ConfigMap over /etc/prosody; otherwise put more settings in /etc/prosody/conf.d/*.cfg.lua.
-- As in the official image, a few settings come from the environment (ENV_<NAME> is $NAME).

data_path = "/var/lib/prosody"
-- posix: Prosody 0.12 stops cleanly on SIGTERM (a pod being deleted) only with it.
modules_enabled = { "roster"; "saslauth"; "disco"; "ping"; "posix" }
log = { [ENV_PROSODY_LOGLEVEL or "info"] = "*console" }

-- Prosody 13 warns about plain Lua functions in the config and offers them as Lua.*; 0.12 has no Lua.
local to_number = Lua and Lua.tonumber or tonumber
statistics = ENV_PROSODY_STATISTICS
statistics_interval = to_number(ENV_PROSODY_STATISTICS_INTERVAL) or ENV_PROSODY_STATISTICS_INTERVAL

VirtualHost (ENV_PROSODY_VIRTUAL_HOST or "localhost")

Include "conf.d/*.cfg.lua"
