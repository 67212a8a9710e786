-- Reads a config with Prosody's own code, for the tests to compare evaluate_prosody_config with.
-- Usage: lua5.4 oracle.lua /abs/path/prosody.cfg.lua (with Debian's prosody package installed).
-- Loads the real core/configmanager.lua and core/statsmanager.lua from /usr/lib/prosody; only the
-- logger and the timer are stubbed, so that statsmanager's decisions can be printed.
-- Output, one fact a line, tab-separated:
--   error <message>            the config does not load (nothing else follows)
--   warning <message>          a configuration warning (e.g. duplicate option)
--   statistics <type> <value>  the global `statistics`
--   module <name>              each string in the global modules_enabled
--   timer <seconds>            statsmanager scheduled a collection every <seconds>
--   stats on|off manual|timer  whether a provider is loaded; whether collection is manual
--   startup-error <message>    statsmanager fails to load: Prosody would stop at startup
package.path = "/usr/lib/prosody/?.lua;" .. package.path
package.cpath = "/usr/lib/prosody/?.so;" .. package.cpath

local function out(...)
	local fields = table.pack(...)
	for i = 1, fields.n do fields[i] = (tostring(fields[i]):gsub("[\t\n]", " ")) end
	print(table.concat(fields, "\t"))
end

package.loaded["util.logger"] = {
	init = function() return function(level, fmt, ...) out("log", level, fmt:format(...)) end end,
}
package.loaded["util.timer"] = { add_task = function(delay) out("timer", delay) end }
prosody = { events = { fire_event = function() end, add_handler = function() end } }

local configmanager = require "core.configmanager"
local ok, _, err = configmanager.load(arg[1])
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
