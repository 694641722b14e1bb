-- wrk script of the per-request scenarios (l7-ka, l7-close): requests go to
-- /a/x and /b/x in turn (each wrk thread alternates), so every connection
-- carries requests for both routes. The requests are made once, with wrk's
-- headers (-H: Host, and Connection: close for l7-close).
local requests, n = nil, 0

function init(args)
   requests = { wrk.format(nil, "/a/x"), wrk.format(nil, "/b/x") }
end

function request()
   n = n + 1
   return requests[n % 2 + 1]
end
