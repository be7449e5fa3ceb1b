// SPDX-License-Identifier: GPL-2.0-or-later

// The D-Bus connection on the event loop when epoll refuses to watch the bus socket (ENOSPC
// at `fs.epoll.max_user_watches`, injected: the sysctl is global and no test may lower it).

import PestoDBus
import PestoModel
import PestoSystem
import PestoTestSupport
import Testing

@testable import PestoDBus
@testable import PestoEngine
@testable import PestoModel
@testable import PestoService

#if canImport(Glibc)
    import Glibc
#endif

@Suite("D-Bus watch refused by epoll", .serialized, .timeLimit(.minutes(10)))
struct DBusWatchTests {
    @Test("a bus socket epoll refuses to watch is watched again after a pause; the reply arrives, nothing traps")
    func rewatch() throws {
        let f = try PestodFixture()  // for its bus
        let loop = try EventLoop()
        let connection = try DBusConnection(.address(f.address))
        let script = SyscallScript()
        script.fail(.epollCtl, with: Errno(rawValue: ENOSPC), times: nil) { $0.epollKind == EngineEventKind.dbus.rawValue }
        var reply: DBusMessage?
        script.run {
            connection.attach(to: loop, kind: EngineEventKind.dbus)
            defer {
                connection.detach()
                loop.removeAllHandlers()
            }
            #expect(script.injectedCount(.epollCtl) > 0, "the bus socket's watch was refused")
            // epoll takes watches again a little later; the pending reply must then arrive.
            loop.after(milliseconds: 30) { script.stopFailing() }
            connection.send(
                .methodCall(
                    destination: "org.freedesktop.DBus", path: "/org/freedesktop/DBus", interface: "org.freedesktop.DBus", member: "GetId")
            ) { m in
                reply = m
                loop.stop()
            }
            let bound = loop.after(milliseconds: 5000) { loop.stop() }  // only a failure takes this long
            loop.run()
            loop.cancelTimer(bound)
        }
        #expect(reply != nil && reply?.isError == false, "the reply arrived once the socket was watched")
    }

    @Test(
        "a connection released after its loop's last other owner detaches without touching a freed loop (an optimised pestod crashed so at every exit)"
    )
    func connectionOutlivesLoop() throws {
        let f = try PestodFixture()  // for its bus
        var connection: DBusConnection? = try DBusConnection(.address(f.address))
        weak var weakLoop: EventLoop?
        do {
            let loop = try EventLoop()
            weakLoop = loop
            connection!.attach(to: loop, kind: EngineEventKind.dbus)
            loop.removeAllHandlers()
        }
        #expect(weakLoop != nil, "the attached connection keeps its loop")
        connection = nil  // libdbus removes its watches through the binding, which uses the loop
        #expect(weakLoop == nil, "released with the connection")
    }
}
