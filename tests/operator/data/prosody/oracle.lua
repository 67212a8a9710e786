-- Reads a config with Prosody's own code, for the tests to compare evaluate_prosody_config with.
-- Usage: lua5.4 oracle.lua SOURCEDIR /abs/path/prosody.cfg.lua
-- SOURCEDIR is a Prosody installation's CFG_SOURCEDIR: /usr/lib/prosody (Debian's 0.12.3) or
-- .cache/prosody-13/usr/lib/prosody (13.0.1, make prosody-13). Loads its real
-- core/configmanager.lua and core/statsmanager.lua; only the logger and the timer are stubbed,
-- so that statsmanager's decisions can be printed. The globals are those Prosody's launcher and
-- util/startup.lua define before reading the config, as the prosody process (not prosodyctl).
-- Output, one fact a line, tab-separated:
--   set <host> <option> <file>:<line>  configmanager stored an option (a call of its local set(),
--                              seen by a call hook), from that line of a config file
--   error <message>            the config does not load (nothing else follows)
--   warning <message>          a configuration warning (e.g. duplicate option)
--   statistics <type> <value>  the global `statistics`
--   module <name>              each string in the global modules_enabled
--   timer <seconds>            statsmanager scheduled a collection every <seconds>
--   stats on|off manual|timer  whether a provider is loaded; whether collection is manual
--   startup-error <message>    statsmanager fails to load: Prosody would stop at startup
local source_dir, config_file = arg[1], arg[2]
package.path = source_dir .. "/?.lua;" .. package.path
package.cpath = source_dir .. "/?.so;" .. package.cpath
-- 13.0: lets require "prosody.util.x" find util/x.lua (its launcher does the same).
if not pcall(require, "prosody.loader") then pcall(require, "loader") end

local function out(...)
	local fields = table.pack(...)
	for i = 1, fields.n do fields[i] = (tostring(fields[i]):gsub("[\t\n]", " ")) end
	print(table.concat(fields, "\t"))
end

package.loaded["util.logger"] = {
	init = function() return function(level, fmt, ...) out("log", level, fmt:format(...)) end end,
}
package.loaded["util.timer"] = { add_task = function(delay) out("timer", delay) end }

-- What /usr/bin/prosody and util/startup.lua's init_global_state define.
CFG_SOURCEDIR = source_dir
CFG_CONFIGDIR = config_file:match("^(.*)/[^/]*$")
CFG_PLUGINDIR = source_dir .. "/modules/"
CFG_DATADIR = "/var/lib/prosody"
prosody = {
	events = { fire_event = function() end, add_handler = function() end },
	process_type = "prosody", platform = "posix", config_file = config_file,
	hosts = {}, bare_sessions = {}, full_sessions = {},
	paths = { source = CFG_SOURCEDIR, config = CFG_CONFIGDIR, plugins = CFG_PLUGINDIR, data = "data" },
}
hosts, bare_sessions, full_sessions = prosody.hosts, prosody.bare_sessions, prosody.full_sessions
log = package.loaded["util.logger"].init("general")

local configmanager = require "core.configmanager"
if configmanager.set_credentials_directory then -- 13.0: util/startup.lua's read_config
	if os.getenv("CREDENTIALS_DIRECTORY") then
		configmanager.set_credentials_directory(os.getenv("CREDENTIALS_DIRECTORY"))
	else
		configmanager.set_credential_fallback_mode("error")
	end
end

-- Where each option is stored from: the innermost frame of a config file (not Prosody's code,
-- not this script) when configmanager's set(config_table, host, key, value) is called.
local manager_source = debug.getinfo(configmanager.load, "S").source
local function config_line()
	for level = 3, 200 do
		local info = debug.getinfo(level, "Sl")
		if not info then return end
		local source = info.source
		if source:sub(1, 1) == "@" and not source:find(source_dir, 2, true)
			and source ~= "@" .. arg[0] and info.currentline > 0 then
			return source:sub(2) .. ":" .. info.currentline
		end
	end
end
debug.sethook(function()
	local info = debug.getinfo(2, "S")
	if info.source ~= manager_source then return end
	local first, host = debug.getlocal(2, 2)
	if debug.getlocal(2, 1) == "config_table" and first == "host"
		and debug.getlocal(2, 3) == "key" and debug.getlocal(2, 4) == "value" then
		local _, key = debug.getlocal(2, 3)
		local where = config_line()
		if where then out("set", host, key, where) end
	end
end, "c")
local ok, _, err = configmanager.load(config_file)
debug.sethook()
if not ok then
	out("error", err)
	return
end
for _, warning in ipairs(err or {}) do out("warning", warning) end
local global = configmanager.getconfig()["*"]
out("statistics", type(global.statistics), global.statistics)
if type(global.modules_enabled) == "table" then
	for _, name in ipairs(global.modules_enabled) do
		if type(name) == "string" then out("module", name) end
	end
end
local loaded, statsmanager = pcall(require, "core.statsmanager")
if not loaded then
	out("startup-error", statsmanager) -- Prosody stops at startup
	return
end
out("stats", statsmanager.get_metric_registry() and "on" or "off",
	statsmanager.collect and "manual" or "timer")
