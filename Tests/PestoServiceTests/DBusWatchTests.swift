// SPDX-License-Identifier: GPL-2.0-or-later

// The D-Bus connection on the event loop when epoll refuses to watch the bus socket (ENOSPC
// at `fs.epoll.max_user_watches`, injected: the sysctl is global and no test may lower it).

import PestoTestSupport
import Testing

@testable import PestoEngine
@testable import PestoModel
@testable import PestoDBus
@testable import PestoService

#if canImport(Glibc)
import Glibc
#endif

@Suite("D-Bus watch refused by epoll", .serialized)
struct DBusWatchTests {
    @Test("a bus socket epoll refuses to watch is watched again after a pause; the reply arrives, nothing traps")
    func rewatch() throws {
        let f = try PestodFixture()  // for its bus
        let loop = try EventLoop()
        let connection = try DBusConnection(.address(f.address))
        var refused = 0
        loop.injectedControlFailure = { kind, _ in
            guard kind == EngineEventKind.dbus else { return nil }
            refused += 1
            return Errno(rawValue: ENOSPC)
        }
        connection.attach(to: loop, kind: EngineEventKind.dbus)
        defer {
            connection.detach()
            loop.removeAllHandlers()
        }
        #expect(refused > 0, "the bus socket's watch was refused")
        // epoll takes watches again a little later; the pending reply must then arrive.
        loop.after(milliseconds: 30) { loop.injectedControlFailure = nil }
        var reply: DBusMessage?
        connection.send(
            .methodCall(destination: "org.freedesktop.DBus", path: "/org/freedesktop/DBus", interface: "org.freedesktop.DBus", member: "GetId")
        ) { m in
            reply = m
            loop.stop()
        }
        let bound = loop.after(milliseconds: 5000) { loop.stop() }  // only a failure takes this long
        loop.run()
        loop.cancelTimer(bound)
        #expect(reply != nil && reply?.isError == false, "the reply arrived once the socket was watched")
    }
}
