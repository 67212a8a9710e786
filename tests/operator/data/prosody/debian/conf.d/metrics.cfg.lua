-- Statistics for the prosody-exporter sidecar. This file is Included at the end of the main
-- config, after VirtualHost "localhost", but an Included file starts in the global section.
statistics = "internal"
statistics_interval = 15
